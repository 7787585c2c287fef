import pytest

from bench.errors import UserError
from bench.tracking import choose_wandb_mode


@pytest.fixture(autouse=True)
def no_account(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))


def test_offline_without_an_account_so_wandb_never_prompts():
    assert choose_wandb_mode() == "offline"


def test_online_when_an_api_key_is_configured(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert choose_wandb_mode() == "online"


def test_online_when_wandb_login_wrote_a_netrc_entry(tmp_path):
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / "netrc").chmod(0o600)
    assert choose_wandb_mode() == "online"


def test_environment_mode_is_respected_and_the_option_wins(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert choose_wandb_mode() == "disabled"
    assert choose_wandb_mode("offline") == "offline"


def test_unknown_mode_lists_the_choices():
    with pytest.raises(UserError, match="choose one of: online, offline, disabled"):
        choose_wandb_mode("cloud")
