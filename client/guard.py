"""The app guard: what a fedtune node runs for each message, in place of Flower's ``flwr-clientapp``.

In a Flower deployment the code a node runs next to its data arrives from the SuperLink
in each run's app bundle (FAB). A fedtune node never runs that code. ``fedtune node``
starts the SuperNode with this guard first on its PATH under the name ``flwr-clientapp``,
so for every message the SuperNode launches the guard, which:

1. pulls the message, the run and its app bundle from the SuperNode, as Flower's own
   process does;
2. checks the bundle **without executing any of it**: its identity in ``pyproject.toml``
   (the fedtune app, the same version as installed here) and, when the node config lists
   ``approved-apps``, its SHA-256 among them;
3. refuses a bundle that fails (an error reply with the reason, which the server records,
   and an error in the node's log), or otherwise hands the message to the fedtune
   ClientApp **installed on this node**, not to the bundle's code.

It reuses Flower 1.41's ClientApp process (``flwr.supernode.runtime.run_clientapp``) and
replaces only its two steps that install and import the bundle's code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
import sys
import tomllib
import zipfile

from fedtune.common.errors import AppRefused

log = logging.getLogger("fedtune.guard")

APP_PUBLISHER = "fedtune"
APP_NAME = "fedtune"
CLIENTAPP = "fedtune.client.app:app"


def installed_version() -> str:
    return importlib.metadata.version("fedtune")


def approved_hashes(node_config) -> set[str]:
    raw = str(node_config.get("approved-apps", "") or "")
    return {h.strip().lower() for h in raw.replace(";", ",").split(",") if h.strip()}


def check_bundle(content: bytes, *, fab_id: str, fab_version: str, node_config) -> str:
    """The bundle's SHA-256 if this node runs it; else raise AppRefused naming why. Reads data only."""
    digest = hashlib.sha256(content).hexdigest()
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as z:
            meta = tomllib.loads(z.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise AppRefused(f"the run's app bundle is unreadable ({e.__class__.__name__})") from None
    app = meta.get("tool", {}).get("flwr", {}).get("app", {})
    name, publisher = meta.get("project", {}).get("name"), app.get("publisher")
    clientapp = app.get("components", {}).get("clientapp")
    mine = installed_version()
    problems = []
    if (publisher, name) != (APP_PUBLISHER, APP_NAME) or fab_id != f"{APP_PUBLISHER}/{APP_NAME}":
        problems.append(f"it is {fab_id!r} ({publisher}/{name}), not the fedtune app")
    elif clientapp != CLIENTAPP:
        problems.append(f"its ClientApp is {clientapp!r}, not fedtune's {CLIENTAPP!r}")
    elif fab_version != mine:
        problems.append(f"it is fedtune {fab_version}, this node runs fedtune {mine}")
    allowed = approved_hashes(node_config)
    if allowed and digest not in allowed:
        problems.append(f"its SHA-256 {digest} is not among this node's approved-apps")
    if problems:
        raise AppRefused("this node runs only the fedtune app its organization installed and approved; refused the "
                         "run's app bundle: " + "; ".join(problems))
    return digest


def main(argv: list[str] | None = None) -> None:
    """Entry point, with ``flwr-clientapp``'s arguments (the SuperNode launches it under that name)."""
    import importlib

    from flwr.clientapp.client_app import ClientApp

    # the modules (their package re-exports functions of the same names)
    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seen: dict = {}
    pull = runtime.pull_task_input

    def pull_and_keep(client):
        message, context, run, fab = pull(client)
        seen.update(context=context, run=run, fab=fab)
        return message, context, run, fab

    def check_instead_of_install(content: bytes, **_) -> None:
        run, context = seen["run"], seen["context"]
        try:
            digest = check_bundle(content, fab_id=run.fab_id, fab_version=run.fab_version,
                                  node_config=context.node_config)
        except AppRefused as e:
            log.error("node %s: %s", context.node_config.get("name", context.node_id), e)
            raise
        log.info("run %s: app bundle %s accepted; running the installed fedtune %s", run.run_id, digest[:16],
                 installed_version())

    def installed_client_app(*_args, **_kw):
        def load(*_a) -> ClientApp:
            from fedtune.client.app import app

            return app

        return load

    runtime.pull_task_input = pull_and_keep
    runtime.install_from_fab = check_instead_of_install
    runtime.get_load_client_app_fn = installed_client_app
    args = cli._parse_args_run_flwr_clientapp().parse_args(argv)
    runtime.run_clientapp(
        runtime_api_address=args.runtime_api_address,
        token=cli.try_obtain_flwr_app_token(args),
        insecure=args.insecure,
        certificates=cli.validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,  # never install what a run asks for on a node
    )


if __name__ == "__main__":
    sys.exit(main())
