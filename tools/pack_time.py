"""Time one budget-fit pack of a run's own quantized entries, read back from its artifact (the header's parts, the
rANS streams decoded), check that they pack to the same bytes, and split the pack's time into its rANS coding and
the xz pass over the payload (docs/quantization.md, "Issue 26").

    python3 tools/pack_time.py <checkout holding train_gpt.py> <artifact.pgolf.xz>
"""

import json
import lzma
import sys
import time

import numpy as np

sys.path.insert(0, sys.argv[1])
import train_gpt as tg  # noqa: E402

data = open(sys.argv[2], "rb").read()
raw = lzma.decompress(data)
pos = len(tg.ARTIFACT_MAGIC)
n = int.from_bytes(raw[pos:pos + 8], "little")
head, body = json.loads(raw[pos + 8:pos + 8 + n]), pos + 8 + n


def array(dt, shape, off, _):
    return np.frombuffer(raw, dtype=np.dtype(dt), count=int(np.prod(shape)), offset=body + off).reshape(shape)


entries = [dict(name=t["name"], scheme=t["scheme"], shape=t["shape"],
                parts={k: v if v == "rans" else array(*v) for k, v in t["parts"].items()}) for t in head["tensors"]]
for part, key in tg.RANS_PARTS.items():
    coded = [i for i, e in enumerate(entries) if isinstance(e["parts"].get(part), str)]
    if coded:
        stream = head[key]
        families = [stream["families"].index(tg.coding_family(entries[i]["name"])) for i in coded]
        t = time.perf_counter()
        qs = tg.rans_decode_matrices({k: array(*v) for k, v in stream["arrays"].items()},
                                     [tg.coded_shape(head["tensors"][i], part) for i in coded], families, stream["offset"])
        print(f"decode {part}: {time.perf_counter() - t:.1f} s")
        for i, q in zip(coded, qs):
            entries[i]["parts"][part] = q
t = time.perf_counter()
blob = tg.pack_artifact(entries, 9, head["config"])
print(f"pack: {time.perf_counter() - t:.1f} s, {len(blob)} bytes, identical to the artifact: {blob == data}")
t = time.perf_counter()
tg.rans_code_parts(entries)
print(f"of which rans_code_parts: {time.perf_counter() - t:.1f} s")
t = time.perf_counter()
lzma.compress(raw, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
print(f"and xz 9e of the {len(raw)}-byte payload: {time.perf_counter() - t:.1f} s")
