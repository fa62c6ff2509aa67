"""moela: run, serve and train DeepSeek-family models (MLA + DeepSeekMoE).

    from moela import LLM, SamplingParams
    llm = LLM(model="path/to/model")
    print(llm.generate("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=64))[0].outputs[0].text)
"""

from moela.engine.config import EngineConfig
from moela.engine.llm import LLM, LLMEngine
from moela.engine.outputs import CompletionOutput, RequestOutput
from moela.engine.sampler import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
