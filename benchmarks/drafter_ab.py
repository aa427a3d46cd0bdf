"""Two builds of nextn's kernel library drafting on the same sequence state: a change to kernels/mtp_module.c
measured against the build before it (runtime/mtp_module.py's NativeDrafter, what `nextn run` drafts with).

    python benchmarks/drafter_ab.py OLD.so NEW.so [--artifact DIR] [--reps 400]

Build OLD.so by checking out the commit before and running anything that opens an int4 artifact (the library
lands in ~/.cache/nextn/kernels/, named by its sources' hash). One held-out prompt is run through the trunk, then
each case resets the MTP modules' valid slots and drafts, the two libraries alternating call by call: a prompt's
catch-up (every slot of both modules, K = 2), a step after 3 accepted drafts (4 catch-up rows, K = 3) and one
after none (1 row, K = 1). The drafts must be equal; medians of the calls' wall time.
"""

import argparse
import statistics
import time
from pathlib import Path

from nextn.embedded import embedded_default
from nextn.prompts import stdlib_sequences
from nextn.runtime.api import Model
from nextn.runtime.decoder import _State
from nextn.runtime.mtp_module import NativeDrafter
from nextn.runtime.sampling import AcceptRule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--artifact", type=Path, default=None, help="an int4-drafts artifact (default: the embedded one)")
    ap.add_argument("--reps", type=int, default=400)
    args = ap.parse_args()
    model = Model(args.artifact or embedded_default(drafts="int4"))
    dec = model.decoder
    if dec.drafter is None:
        raise SystemExit("this artifact's MTP graphs do not run on nextn's kernel (not int4, or no C compiler)")
    drafters = [NativeDrafter(lib, dec.drafter.modules) for lib in (args.old, args.new)]
    prompt = stdlib_sequences(model.tokenizer, "heldout", 1, 65)[0]
    st = _State(dec, 512)
    st.tokens = list(prompt)
    dec.trunk_rows([st], [prompt[:-1]], [dec.new_stats(len(prompt), 0, AcceptRule())])
    n = st.n
    cases = (("a prompt's catch-up, K = 2", [0, 0], 2, args.reps // 8), ("4 catch-up rows, K = 3", [n - 4, n - 5], 3, args.reps),
             ("1 row, K = 1", [n - 1, n - 2], 1, args.reps))  # fmt: skip
    for name, valid, k, reps in cases:
        times: list[list[float]] = [[], []]
        drafts = [None, None]
        for _ in range(reps):
            for i, drafter in enumerate(drafters):
                st.mtp_valid[:] = valid
                t = time.perf_counter()
                drafts[i] = drafter.draft(st, k, dec.prefill_chunk)
                times[i].append(time.perf_counter() - t)
        assert drafts[0] == drafts[1], (name, drafts)
        old, new = (statistics.median(t) * 1e6 for t in times)
        print(f"{name:28s} old {old:8.1f} us   new {new:8.1f} us   new / old {new / old:.3f}")
    model.close()


if __name__ == "__main__":
    main()
