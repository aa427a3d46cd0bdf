"""The 8 MoE ops of the embedded model alone at 1, 2 and 4 rows, as one node each and per row (Scan).

    python benchmarks/moe_op_rows.py

Random weights of the embedded sizes (8 layers, E 8, H 256, I 96, top 2), fresh routing every call, 1 thread.
"""
import numpy as np, onnxruntime as ort, time, statistics
from onnx import helper as h, TensorProto as TP, numpy_helper as nh
E,H,I,K,L=8,256,96,2,8
rng=np.random.default_rng(0)
def moe_node(i, x, rp, y):
    return h.make_node("MoE",[x,rp,f"w1_{i}","",f"w2_{i}"],[y],domain="com.microsoft",k=K,activation_type="swiglu",swiglu_fusion=1,activation_alpha=1.0,activation_beta=0.0)
inits=[]
for i in range(L):
    inits.append(nh.from_array((rng.standard_normal((E,2*I,H))*0.05).astype(np.float32),f"w1_{i}"))
    inits.append(nh.from_array((rng.standard_normal((E,H,I))*0.05).astype(np.float32),f"w2_{i}"))
def build(scan):
    nodes=[]; cur="x"
    for i in range(L):
        out=f"y{i}"
        if not scan:
            nodes.append(moe_node(i,cur,"rp",out))
        else:
            body=h.make_graph([moe_node(i,"bx","brp","by0"), ],f"b{i}",
                [h.make_tensor_value_info("bx",TP.FLOAT,[H]),h.make_tensor_value_info("brp",TP.FLOAT,[E])],
                [h.make_tensor_value_info("by",TP.FLOAT,[H])])
            # MoE needs 2D: unsqueeze/squeeze inside
            body=h.make_graph([h.make_node("Unsqueeze",["bx","ax"],["bx2"]),h.make_node("Unsqueeze",["brp","ax"],["brp2"]),
                               moe_node(i,"bx2","brp2","by2"),h.make_node("Squeeze",["by2","ax"],["by"])],f"b{i}",
                [h.make_tensor_value_info("bx",TP.FLOAT,[H]),h.make_tensor_value_info("brp",TP.FLOAT,[E])],
                [h.make_tensor_value_info("by",TP.FLOAT,[H])],initializer=[nh.from_array(np.array([0],np.int64),"ax")])
            nodes.append(h.make_node("Scan",[cur,"rp"],[out],num_scan_inputs=2,body=body))
        cur=out
    g=h.make_graph(nodes,"g",[h.make_tensor_value_info("x",TP.FLOAT,["n",H]),h.make_tensor_value_info("rp",TP.FLOAT,["n",E])],[h.make_tensor_value_info(cur,TP.FLOAT,["n",H])],initializer=inits)
    return h.make_model(g,opset_imports=[h.make_opsetid("",23),h.make_opsetid("com.microsoft",1)])
so=ort.SessionOptions(); so.intra_op_num_threads=1; so.log_severity_level=3
S={k:ort.InferenceSession(build(k).SerializeToString(),so,providers=["CPUExecutionProvider"]) for k in (False,True)}
for n in (1,2,4):
    res={False:[],True:[]}
    for r in range(5):
        for k,s in S.items():
            feeds=[]
            for _ in range(60):
                rp=np.full((n,E),-np.inf,np.float32)
                for t in range(n): rp[t,rng.choice(E,2,replace=False)]=np.log([0.6,0.4])
                feeds.append({"x":rng.standard_normal((n,H)).astype(np.float32)*0.1,"rp":rp})
            for f in feeds[:10]: s.run(None,f)
            t0=time.perf_counter()
            for f in feeds[10:]: s.run(None,f)
            res[k].append((time.perf_counter()-t0)/50*1e6)
    print(f"N={n}: 8 MoE nodes {statistics.median(res[False]):.0f} us, 8 Scan(MoE per row) {statistics.median(res[True]):.0f} us")
