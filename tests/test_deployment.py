"""docker-compose.yml and the Dockerfile say what the README says (no Docker engine here: they are parsed)."""
import re

import yaml

from sim_backend.settings import Settings
from sim_model.datasets import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def _readme_command() -> str:
    return next(line.strip() for line in README.splitlines() if line.strip().startswith(".venv/bin/gunicorn"))


def test_compose_runs_label_studio_1_23_2_and_the_backend_as_the_readme_says():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    ls, backend = compose["services"]["label-studio"], compose["services"]["sim-backend"]
    assert ls["image"].endswith(":1.23.2")
    assert backend["command"] == _readme_command()
    env = backend["environment"]
    run_section = README[README.index("## Run the backend"):README.index("### Prelabel")]
    for var in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MODEL_DIR", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        assert var in env and var in run_section, var
    assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert "BASIC_AUTH_PASS:?" in env["BASIC_AUTH_PASS"]  # compose refuses to start without a password
    assert any(v.endswith(f":{env['MODEL_DIR']}") for v in backend["volumes"]) and "models" in compose["volumes"]
    for service in (ls, backend):
        assert service["healthcheck"]["test"] and "health" in " ".join(service["healthcheck"]["test"])
    assert backend["depends_on"]["label-studio"]["condition"] == "service_healthy"
    # every variable the compose file sets is one the backend reads
    known = {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MODEL_DIR", "DEVICE", "BASIC_AUTH_USER", "BASIC_AUTH_PASS",
             "MAX_CONCURRENT_RETRAINS", "REQUEST_DEADLINE_S"}
    assert set(env) <= known
    parsed = Settings.from_env({k: str(v) for k, v in env.items() if "$" not in str(v)})
    assert parsed.max_concurrent_retrains == 1 and parsed.request_deadline_s == 90


def test_the_dockerfile_installs_and_serves_as_the_readme_says():
    docker = (REPO_ROOT / "Dockerfile").read_text()
    assert "bash scripts/install.sh" in docker and "bash scripts/install.sh" in README
    cmd = re.search(r"^CMD (\[.*\])$", docker, re.M).group(1)
    assert " ".join(yaml.safe_load(cmd)) == _readme_command()
    assert "HEALTHCHECK" in docker and "/health" in docker
