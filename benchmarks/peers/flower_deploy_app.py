"""The Flower app ``flower_deploy`` runs on a SuperLink: flower_app's ClientApp and FedAvg.

``flwr run`` ships it as a Flower App Bundle with ``flower_app.py`` beside it (both copied
into an app folder with a ``pyproject.toml``, see ``flower_deploy.write_app``). The
ClientApp is ``flower_app.client_app`` itself (receive, add 1.0, send; timestamps in the
folder the server sends); the ServerApp runs ``flower_app.start_fedavg`` with the scenario
from the run config (``params``, ``clients``, ``rounds``, ``times``). Standalone on purpose
(it runs in Flower's processes, from the bundle): it imports only Flower, numpy and
``flower_app``.
"""

from flower_app import client_app, start_fedavg
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

__all__ = ["client_app", "server_app"]

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    params, clients = int(config["params"]), int(config["clients"])
    sizes = [params // 10] * 10
    sizes[-1] += params - sum(sizes)
    start_fedavg(grid, sizes, clients, int(config["rounds"]), str(config["times"]))
