"""``python -m training.registry``: list a project's versions and roll back."""
import json

from sim_model.registry import ModelRegistry
from training.registry import main


def _write_version(reg: ModelRegistry, project, metrics: dict) -> str:
    with reg.create_version(project) as (version, vdir):
        (vdir / "model.pth").write_bytes(b"weights of " + version.encode())
        (vdir / "config.yaml").write_text("MODEL:\n  META_ARCHITECTURE: CondInst\n")
        (vdir / "classes.json").write_text(json.dumps({"labels": ["cat", "dog"]}))
        (vdir / "metrics.json").write_text(json.dumps(metrics))
    return version


def test_cli_lists_versions_and_rolls_back(tmp_path, capsys):
    reg = ModelRegistry(tmp_path)
    v1 = _write_version(reg, 6, {"val": {"mIoU": 0.71, "AP": 40.0, "n_masks": 5}})
    reg.publish(6, v1, reg.read_metrics(6, v1), 0.02)
    v2 = _write_version(reg, 6, {"val": {"mIoU": 0.5, "n_masks": 5}})
    reg.publish(6, v2, reg.read_metrics(6, v2), 0.02)  # refused
    assert main(["--project", "6", "--model-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("* v0001") and "0.7100" in out[2] and "40.0" in out[2]
    assert out[3].startswith("  v0002") and "kept, not served" in out[3]
    assert main(["--project", "6", "--model-dir", str(tmp_path), "--set-current", "v0002"]) == 0
    assert reg.current_version(6) == "v0002"
    assert main(["--project", "6", "--model-dir", str(tmp_path), "--set-current", "v0009"]) == 3
    assert reg.current_version(6) == "v0002"
