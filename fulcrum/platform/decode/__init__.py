"""The decoding engine: one `generate()` for every architecture, with decoding strategies as
values (greedy, sampling, lookahead, speculative, Speculative Cascades) and optional KV-cache
quantization (KVQuant).

  generate(model, params, prompts, 64, strategy=Lookahead(window=6, ngram=6, candidates=0))

`prompt.decode_prompt` (what `fulcrum decode` runs) reads workdirs; it is not imported here,
since `platform/workdir.py` imports this package's `kv_calibration`.
"""

from fulcrum.platform.decode.autoregressive import Greedy, Sample
from fulcrum.platform.decode.generate import Generation, generate
from fulcrum.platform.decode.lookahead import Lookahead
from fulcrum.platform.decode.sampling import Sampling
from fulcrum.platform.decode.speculative import Cascade, Draft, Speculative
from fulcrum.platform.decode.strategies import STRATEGIES

__all__ = [
  "STRATEGIES",
  "Cascade",
  "Draft",
  "Generation",
  "Greedy",
  "Lookahead",
  "Sample",
  "Sampling",
  "Speculative",
  "generate",
]
