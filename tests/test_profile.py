import pytest

from effarch import paths, profile


def test_tiny_when_asked(monkeypatch):
    monkeypatch.setenv("EFFARCH_PROFILE", "tiny")
    monkeypatch.delenv("EFFARCH_WEIGHTS", raising=False)
    p = profile.get_profile()
    assert p.name == "tiny" and p.is_tiny and "EFFARCH_PROFILE=tiny" in p.reason


def test_auto_without_gpu_is_tiny_and_says_why(monkeypatch):
    monkeypatch.setenv("EFFARCH_PROFILE", "auto")
    monkeypatch.delenv("EFFARCH_WEIGHTS", raising=False)
    monkeypatch.setenv("EFFARCH_DEVICE", "cpu")
    p = profile.get_profile()
    assert p.name == "tiny" and "no CUDA GPU" in p.reason
    assert "tiny" in p.describe() and "cpu" in p.describe()


def test_auto_with_gpu_but_nothing_cached_is_tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFARCH_PROFILE", "auto")
    monkeypatch.delenv("EFFARCH_WEIGHTS", raising=False)
    monkeypatch.setenv("EFFARCH_DEVICE", "cuda")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    p = profile.get_profile()
    assert p.name == "tiny" and "not in the local cache" in p.reason
    assert "prefetch_models.py" in p.reason


def test_random_weights_select_full(monkeypatch):
    monkeypatch.setenv("EFFARCH_PROFILE", "auto")
    monkeypatch.setenv("EFFARCH_WEIGHTS", "random")
    p = profile.get_profile()
    assert p.name == "full" and p.random_weights


def test_random_weights_ignored_for_tiny(monkeypatch):
    monkeypatch.setenv("EFFARCH_PROFILE", "tiny")
    monkeypatch.setenv("EFFARCH_WEIGHTS", "random")
    p = profile.get_profile()
    assert p.weights == "pretrained" and "ignored" in p.reason


def test_bad_value_names_the_choices(monkeypatch):
    monkeypatch.setenv("EFFARCH_PROFILE", "huge")
    with pytest.raises(ValueError, match="tiny, full, auto"):
        profile.get_profile()


def test_paths_do_not_depend_on_cwd(monkeypatch, tmp_path):
    root = paths.repo_root()
    monkeypatch.chdir(tmp_path)
    assert paths.repo_root() == root
    assert (root / "pyproject.toml").is_file()
    assert paths.zoo_dir() == root / "data" / "zoo"


def test_root_override_and_missing_repo(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFARCH_ROOT", str(tmp_path))
    assert paths.repo_root() == tmp_path.resolve()


def test_strict(monkeypatch):
    monkeypatch.setenv("EFFARCH_STRICT", "1")
    assert profile.strict()
    monkeypatch.setenv("EFFARCH_STRICT", "0")
    assert not profile.strict()


def test_device_override(monkeypatch):
    monkeypatch.setenv("EFFARCH_DEVICE", "cpu")
    assert profile.default_device() == "cpu"
