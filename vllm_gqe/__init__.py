"""Grouped Query Experts in vLLM: a native model class for the checkpoints `modeling_gqe` writes.

Installing this project registers `register` under the `vllm.general_plugins` entry point, which vLLM calls in
every process it starts; it makes the "gqe" config known to transformers and maps the `GQEForCausalLM`
architecture to `vllm_gqe.model.GQEForCausalLM`. Then `LLM(model=FOLDER)` and
`python -m vllm.entrypoints.openai.api_server --model FOLDER` serve any folder written by `save_pretrained` or
`gqe-upcycle`, with no user code and no `trust_remote_code`.
"""


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from modeling_gqe.configuration_gqe import GQEConfig

    AutoConfig.register("gqe", GQEConfig, exist_ok=True)
    try:  # refuse what cannot be served while vLLM builds its config, before any engine process starts
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP

        from .servable import GQEConfigCheck

        MODELS_CONFIG_MAP.setdefault("GQEForCausalLM", GQEConfigCheck)
    except ImportError:  # a vLLM without the hook: the model class still refuses when it is built
        pass
    # Lazy ("module:class"): vLLM imports the model in the worker process that builds it.
    ModelRegistry.register_model("GQEForCausalLM", "vllm_gqe.model:GQEForCausalLM")
