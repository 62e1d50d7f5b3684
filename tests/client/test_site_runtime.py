"""The warm ClientApp launcher runs the run's app code from its FAB, not the site's install."""

from __future__ import annotations

import sys

from flwr.supercore.object_ref import load_app

from client.site_runtime import APP_PACKAGES, PRELOAD, forget_app_packages


def _fake_fab(root):
    pkg = root / "client"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "app.py").write_text("ORIGIN = 'fab'\n")
    return root


def test_a_forked_clientapp_loads_client_app_from_the_fab_dir(tmp_path, monkeypatch):
    import client.records  # noqa: F401  (what unpickling the launcher's target imports)

    fab = _fake_fab(tmp_path / "fab")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in APP_PACKAGES}
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        forget_app_packages()
        assert not [m for m in sys.modules if m.split(".")[0] in APP_PACKAGES]
        # Flower's own loader, as flwr-clientapp calls it with the installed FAB's directory.
        assert load_app("client.app:ORIGIN", ValueError, project_dir=fab) == "fab"
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] in APP_PACKAGES]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_the_fork_server_preloads_no_hmgdm_code():
    assert not [m for m in PRELOAD if m.split(".")[0] in APP_PACKAGES]
