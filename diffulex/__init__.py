"""Diffulex: a serving engine for diffusion language models."""

from diffulex.request import RequestOutput
from diffulex.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and the engine: import it lazily so `import diffulex` stays light.
    if name == "LLM":
        from diffulex.llm import LLM

        return LLM
    raise AttributeError(name)
