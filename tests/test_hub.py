"""Hub push / pull through the real huggingface_hub client against a Hub-compatible server on 127.0.0.1."""

import ipaddress
import json
import socket

import pytest
import torch
from hub_server import HubServer
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from seer_adapter import AutoSeerModelForCausalLM, SeerAttentionConfig, SeerConfigError, SeerModel, get_seer_model
from seer_adapter.cli import main as cli_main
from seer_adapter.hub import write_model_card
from seer_adapter.peft_integration import PEFT_AVAILABLE

IDS = torch.randint(3, 128, (2, 90), generator=torch.Generator().manual_seed(0))
TOKEN, BOB_TOKEN = "hf_alice_write_token", "hf_bob_write_token"
REPO = "alice/tiny-llama-seer-gates"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh Hub on loopback, an empty cache, no stored token, online mode, and no other network."""
    from huggingface_hub import constants, hf_api

    server = HubServer({TOKEN: "alice", BOB_TOKEN: "bob"}).start()
    try:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(name, raising=False)  # CI sets HF_HUB_OFFLINE=1 for the whole run
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # the test server speaks LFS, not Xet
        settings = {
            "ENDPOINT": server.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_CACHE": str(tmp_path / "hf_home" / "hub"),
            "HF_TOKEN_PATH": str(tmp_path / "hf_home" / "token"),
            "HF_STORED_TOKENS_PATH": str(tmp_path / "hf_home" / "stored_tokens"),
        }
        for name, value in settings.items():
            monkeypatch.setattr(constants, name, value)
        # huggingface_hub's module-level functions (file_exists, used by peft) share an HfApi made at import time
        monkeypatch.setattr(hf_api.api, "endpoint", server.url)
        _allow_only_loopback(monkeypatch)
        yield server
    finally:
        server.stop()


def _allow_only_loopback(monkeypatch):
    connect = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not ipaddress.ip_address(address[0]).is_loopback:
            raise OSError(f"the Hub tests may only reach 127.0.0.1, not {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.fixture
def base_dir(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _seer(base_dir, seed):
    config = SeerAttentionConfig(block_size=16, dense_below_length=0, sparsity_method="nz_ratio", nz_ratio=0.8)
    model = get_seer_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates().values():
            gate.k_proj.weight.copy_(torch.randn(gate.k_proj.weight.shape, generator=generator))
    return model


def _load(base_dir, repo=REPO, **kwargs):
    return SeerModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), repo, **kwargs)


def test_push_then_pull_into_an_empty_cache(hub, base_dir, tmp_path):
    model = _seer(base_dir, seed=1)
    want = model(IDS).logits
    commit = model.push_to_hub(
        REPO,
        token=TOKEN,
        private=True,
        training_data=["alice/books", "a few plays"],
        metrics={"perplexity (dense)": 41.75},
    )
    assert hub.head(REPO) == commit.oid
    assert sorted(hub.repos[REPO].commits[commit.oid].files) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert hub.repos[REPO].commits[commit.oid].files["adapter_model.safetensors"].lfs
    with pytest.raises(FileNotFoundError, match="private"):  # a private repo without a token is not found
        _load(base_dir)

    assert not list((tmp_path / "hf_home" / "hub").glob("models--*/snapshots/*/*"))  # nothing cached yet
    pulled = _load(base_dir, token=TOKEN)
    saved, loaded = model.get_adapter_state_dict(), pulled.get_adapter_state_dict()
    assert sorted(saved) == sorted(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(pulled(IDS).logits, want)
    assert (tmp_path / "hf_home" / "hub" / "models--alice--tiny-llama-seer-gates").is_dir()

    auto = AutoSeerModelForCausalLM.from_pretrained(REPO, token=TOKEN)  # the base named in adapter_config.json
    assert torch.equal(auto(IDS).logits, want)
    if PEFT_AVAILABLE:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), REPO, token=TOKEN)
        assert torch.equal(peft_model(IDS).logits, want)

    from huggingface_hub import ModelCard

    card = ModelCard(hub.file(REPO, "README.md").decode())
    assert card.data.library_name == "peft" and card.data.datasets == ["alice/books"]
    assert card.data.base_model is None  # a local base path is no Hub id: kept out of the metadata
    assert "seer-attention" in card.data.tags
    assert f'AutoSeerModelForCausalLM.from_pretrained("{REPO}")' in card.text
    assert "| perplexity (dense) | 41.75 |" in card.text and "## Measured sparsity" in card.text
    assert "a few plays" in card.text and "| nz_ratio | 0.8 |" in card.text


def test_revision_pinning_and_offline_reload(hub, base_dir, monkeypatch):
    first, second = _seer(base_dir, seed=1), _seer(base_dir, seed=2)
    want_first, want_second = first(IDS).logits, second(IDS).logits
    v1 = first.push_to_hub(REPO, token=TOKEN).oid
    v2 = second.push_to_hub(REPO, token=TOKEN, commit_message="second gates").oid
    assert v1 != v2 and hub.head(REPO) == v2 and hub.repos[REPO].commits[v2].message == "second gates"
    assert torch.equal(_load(base_dir, revision=v1)(IDS).logits, want_first)
    assert torch.equal(_load(base_dir)(IDS).logits, want_second)
    first.push_to_hub(REPO, token=TOKEN, revision="experiment")  # a new branch; main does not move
    assert hub.head(REPO) == v2 and hub.head(REPO, "experiment") != v2
    assert torch.equal(_load(base_dir, revision="experiment")(IDS).logits, want_first)

    hub.stop()  # offline: everything must come from the cache
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert torch.equal(_load(base_dir, revision=v1)(IDS).logits, want_first)
    assert torch.equal(_load(base_dir)(IDS).logits, want_second)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        _load(base_dir, repo="alice/never-downloaded")


def test_refused_tokens_give_a_clear_error(hub, base_dir):
    model = _seer(base_dir, seed=1)
    with pytest.raises(PermissionError, match="refused the token.*401.*Invalid credentials"):
        model.push_to_hub(REPO, token="hf_not_a_token")
    assert REPO not in hub.repos
    model.push_to_hub(REPO, token=TOKEN)
    with pytest.raises(PermissionError, match="refused the token.*403"):  # bob may not write to alice's repo
        model.push_to_hub(REPO, token=BOB_TOKEN, commit_message="not allowed")
    with pytest.raises(PermissionError, match="refused the token"):
        _load(base_dir, token="hf_not_a_token")
    assert len(hub.repos[REPO].commits) == 2  # the initial commit and alice's push


def test_repos_that_are_not_seer_adapters(hub, base_dir, tmp_path):
    from huggingface_hub import HfApi

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}))
    (lora / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    api = HfApi(token=TOKEN)
    api.create_repo("alice/a-lora")
    api.upload_folder(repo_id="alice/a-lora", folder_path=lora)
    hub.requests.clear()
    with pytest.raises(SeerConfigError, match="LORA adapter.*not a SeerAttention adapter"):
        _load(base_dir, repo="alice/a-lora")
    with pytest.raises(SeerConfigError, match="LORA"):
        AutoSeerModelForCausalLM.from_pretrained("alice/a-lora")
    assert not [path for _, path in hub.requests if path.endswith("adapter_model.safetensors")]  # refused early

    api.create_repo("alice/empty")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        _load(base_dir, repo="alice/empty")
    with pytest.raises(FileNotFoundError, match="no adapter repo 'alice/missing'"):
        _load(base_dir, repo="alice/missing")
    with pytest.raises(FileNotFoundError, match="no revision 'v9'"):
        _load(base_dir, repo="alice/a-lora", revision="v9")


def test_interrupted_upload_leaves_the_remote_unchanged(hub, base_dir):
    first, second = _seer(base_dir, seed=1), _seer(base_dir, seed=2)
    v1 = first.push_to_hub(REPO, token=TOKEN).oid
    weights_v1 = hub.file(REPO, "adapter_model.safetensors")
    hub.drop_next_commit()  # the connection drops while the commit is being sent
    with pytest.raises(ConnectionError, match="interrupted.*previous revision"):
        second.push_to_hub(REPO, token=TOKEN)
    assert hub.head(REPO) == v1 and hub.file(REPO, "adapter_model.safetensors") == weights_v1
    assert torch.equal(_load(base_dir)(IDS).logits, first(IDS).logits)
    v2 = second.push_to_hub(REPO, token=TOKEN).oid  # pushing again completes the upload
    assert hub.head(REPO) == v2 != v1
    assert torch.equal(_load(base_dir)(IDS).logits, second(IDS).logits)


def test_cli_inspect_reads_a_hub_repo(hub, base_dir, capsys):
    _seer(base_dir, seed=1).push_to_hub(REPO, token=TOKEN)
    assert cli_main(["inspect", REPO, "--json", "--base-model", str(base_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 2 * 4 * 16 * 48 and info["base_model_check"]["fits"]


def test_model_card_metadata_and_tables(tmp_path):
    from huggingface_hub import ModelCard

    base = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config = SeerAttentionConfig(base_model_name_or_path=base, model_type="llama", gated_layers=[0, 1])
    stats = [
        {"layer": 0, "mode": "sparse", "q_len": 4096, "kept_blocks": 500, "causal_blocks": 2080, "density": 0.25},
        {"layer": 1, "mode": "dense", "reason": "dense layer", "q_len": 4096, "density": 1.0},
    ]
    write_model_card(
        tmp_path,
        config,
        stats,
        training_data="HuggingFaceFW/fineweb-edu",
        metrics={"perplexity (sparse)": 12.5},
        repo_id="u/gates",
        num_parameters=100,
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == base and f"base_model:adapter:{base}" in card.data.tags
    assert card.data.datasets == ["HuggingFaceFW/fineweb-edu"] and card.data.pipeline_tag == "text-generation"
    assert "(100 gate parameters)" in card.text and f'AutoModelForCausalLM.from_pretrained("{base}")' in card.text
    assert "(4096 tokens, threshold); mean 0.625" in card.text
    assert "| 0 | sparse | 0.250 |" in card.text and "| 1 | dense | 1.000 |" in card.text
    assert "| perplexity (sparse) | 12.5 |" in card.text
