"""training.prelabel's failure paths (the whole run against a real Label Studio: tests/e2e)."""
from __future__ import annotations

from training import prelabel
from tests.support import FileServer, jwt_token


def test_a_refused_personal_access_token_exits_4_with_a_message(tmp_path, monkeypatch, capsys):
    with FileServer(tmp_path, pat=jwt_token("refresh", 3600)) as ls:
        for k, v in {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": jwt_token("refresh", 3600),
                     "MODEL_DIR": str(tmp_path / "models")}.items():
            monkeypatch.setenv(k, v)
        assert prelabel.main(["--project", "3"]) == prelabel.EXIT_LABEL_STUDIO
    err = capsys.readouterr().err
    assert "error:" in err and "401" in err and "Traceback" not in err
