"""The data stage: LLM-synthesised training pairs, quality gates and hard-negative mining.

    from embedforge.data_synth import SynthConfig, synthesize, FilterConfig, filter_pairs, MineConfig, mine

    synthesize(SynthConfig(corpus="docs/", output="synth/", model="builtin:smollm2"))
    filter_pairs(FilterConfig(input=["synth/"], output="filtered/", teacher="builtin:minilm"))
    mine(MineConfig(data=["filtered/"], corpus="docs/", output="mined/", model="builtin:minilm"))

Each function takes one config (paths included) and returns a typed outcome with `warnings` for
results that ran but produced little of use. CLI: `embedforge synth | filter | mine`. See
README.md in this folder. (Importing these is light: torch and the models load inside the calls.)
"""

from embedforge.data_synth.filtering import FilterConfig, FilterOutcome, filter_pairs
from embedforge.data_synth.generate import SynthConfig
from embedforge.data_synth.mine import MineConfig, MineOutcome, mine  # the function, not the module
from embedforge.data_synth.synthesize import SynthesisOutcome, synthesize

__all__ = [
    "FilterConfig",
    "FilterOutcome",
    "MineConfig",
    "MineOutcome",
    "SynthConfig",
    "SynthesisOutcome",
    "filter_pairs",
    "mine",
    "synthesize",
]
