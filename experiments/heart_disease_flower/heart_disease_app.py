"""fedjax_med on Flower: Fed-Heart-Disease with one hospital per SuperNode.

    flwr run experiments/heart_disease_flower <connection> --run-config "algorithm='scaffold'"

`server` and `client` are the app's components (pyproject.toml); both build the
task of heart_disease_task.py from the run config. README.md here shows the
whole deployment on one machine.
"""

from fedjax_med.deploy import flower

from heart_disease_task import make_task

server = flower.server_app(make_task)
client = flower.client_app(make_task)
