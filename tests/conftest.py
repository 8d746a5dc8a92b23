import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_cfg():
    from ovlt.config import CONFIG_ROOT, load_config
    return load_config(CONFIG_ROOT / "model" / "tiny.yaml").model


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_model_cfg):
    """A random-init tiny Qwen2.5-VL saved with save_pretrained (sharded, with index json)."""
    from ovlt.models.qwen2_5_vl.hf_config import save_tiny_hf_model
    out = tmp_path_factory.mktemp("tiny_hf")
    save_tiny_hf_model(out, tiny_model_cfg, max_shard_size="8MB")
    return out
