import subprocess
import sys
from pathlib import Path

from effarch import __main__ as cli

ROOT = Path(__file__).resolve().parents[1]


def test_doctor_reports_offline_tiny_and_paths(monkeypatch, capsys):
    monkeypatch.setenv("EFFARCH_PROFILE", "auto")
    monkeypatch.setenv("EFFARCH_DEVICE", "cpu")  # auto picks tiny without a GPU, also on one
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("EFFARCH_WEIGHTS", raising=False)
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "hub: offline" in out
    assert "profile tiny" in out
    # one answer per way of running the profile's Mamba, with its reason
    assert "mamba paths for this profile's Mamba (tiny-mamba)" in out
    assert "through transformers: sequential fallback — mamba-ssm is not installed" in out
    assert "through effarch.fast: chunked PyTorch scan prefill" in out
    assert "mambapy parallel scan: True" not in out
    assert "bitsandbytes usable:" in out
    for name in ("mamba-2.8b", "phi-2", "tiny-moe"):
        assert name in out


def test_prefetch_dry_run_lists_full_profile():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prefetch_models.py"), "--dry-run"],
                       capture_output=True, text=True, check=True)
    assert "state-spaces/mamba-2.8b-hf" in r.stdout and "microsoft/phi-2" in r.stdout


def test_prefetch_offline_is_a_clear_error():
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prefetch_models.py"),
                        "mamba-130m"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "TROUBLESHOOTING.md" in r.stderr


def test_prefetch_refuses_zoo_models_with_a_reason():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prefetch_models.py"), "tiny-mamba",
                        "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2 and "data/zoo" in r.stderr
