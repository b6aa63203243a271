"""Step-0 sanity reference: the unquantized float32 model's loss on the bench batch.

transformers' ``AutoModelForCausalLM`` on the same directory, float32, no quantization, no
adapters, ``labels=input_ids`` (the bench's loss). Every side's step-0 loss is this model's loss
after its own 4-bit rounding of the seven projections, so all three should sit near it; the
two bitsandbytes-faithful NF4 + double-quantization sides (ours, torch) should agree with each
other to ~1e-3.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    spec = common.read_spec()
    import torch
    import transformers

    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    ids = torch.as_tensor(common.tokens(spec), dtype=torch.long)
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    Path(spec["out"]).write_text(json.dumps({"side": "reference", "loss": loss,
                                             "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
