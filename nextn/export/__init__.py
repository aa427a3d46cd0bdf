"""Export: trunk and each MTP module as separate, validated ONNX graphs sharing one weights file (`nextn export`)."""
