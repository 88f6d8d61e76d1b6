"""Builds the notebooks from plain Python cell lists (outputs cleared).

    .venv/bin/python notebooks/src/build_notebooks.py

Cells are kept here as strings so the notebooks stay reviewable in diffs; the
test suite executes the generated .ipynb files top to bottom.
"""

import os

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.dirname(HERE)


def notebook(cells):
  nb = nbformat.v4.new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  for kind, text in cells:
    text = text.strip("\n")
    nb.cells.append(nbformat.v4.new_markdown_cell(text) if kind == "md"
                    else nbformat.v4.new_code_cell(text))
  return nb


QUICKSTART = [
    ("md", """
# fedjax_med quickstart: four hospitals, one model

Fed-Heart-Disease (FLamby): Cleveland, Hungary, Switzerland and Long Beach VA, bundled
with the package. We train FedAvg, and compare it with each hospital training alone
(local) and with pooling every patient (the centralised upper reference).

The federated objective is explicit: $F(w) = \\sum_k \\frac{n_k}{n} F_k(w)$.
"""),
    ("code", """
import jax
import numpy as np
import optax
import matplotlib.pyplot as plt
import fedjax_med as fm

train, test = fm.datasets.heart_disease()          # per-site standardisation
pooled_train, pooled_test = fm.datasets.heart_disease(standardize="pooled")
print(train)
print("n_k:", np.asarray(train.num_examples))
"""),
    ("code", """
model = fm.models.LogisticRegression()
loss_fn = fm.losses.sigmoid_binary_cross_entropy(model.apply)
params = model.init(jax.random.PRNGKey(0), train.x[0, :1])
print("F(w0) =", float(fm.weighted_objective(loss_fn, params, train)))
print("F_k(w0) =", np.asarray(fm.site_objectives(loss_fn, params, train)).round(3))
"""),
    ("md", """
## FedAvg: one jit-compiled round, all sites vmapped
"""),
    ("code", """
fedavg = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.05),
                              local_epochs=1, batch_size=4)
state, history = fm.run_rounds(fedavg, fedavg.init(params), train, 40,
                               jax.random.PRNGKey(1), progress=False)
fedavg_report = fm.evaluation.binary_report(model.apply, state.params, test)
print({k: round(v["accuracy"], 3) for k, v in fedavg_report.items()})
"""),
    ("md", """
## Local-only and pooled references, in the same harness
"""),
    ("code", """
adam = fm.algorithms.local_only(loss_fn, optimizer=optax.adam(1e-3), local_epochs=1,
                                batch_size=4)
local_state, local_history = fm.run_rounds(adam, adam.init(params, train.num_sites), train, 40,
                                           jax.random.PRNGKey(1), progress=False)
local_report = fm.evaluation.binary_report(model.apply, local_state.client_states["params"],
                                           test, per_site_params=True)
pooled_state, pooled_history = fm.run_rounds(adam, adam.init(params, 1), pooled_train.pooled(),
                                             40, jax.random.PRNGKey(1), progress=False)
pooled_params = fm.evaluation.unstack(pooled_state.client_states["params"], 0)
pooled_report = fm.evaluation.binary_report(model.apply, pooled_params, pooled_test)
"""),
    ("code", """
sites = list(train.names) + ["mean"]
reports = {"local": local_report, "FedAvg": fedavg_report, "pooled": pooled_report}
fig, ax = plt.subplots(figsize=(8, 3.5))
width = 0.27
for i, (name, report) in enumerate(reports.items()):
    ax.bar(np.arange(len(sites)) + (i - 1) * width,
           [report[s]["accuracy"] for s in sites], width, label=name)
ax.set_xticks(range(len(sites)), sites)
ax.set_ylabel("test accuracy")
ax.set_ylim(0.4, 1.0)
ax.legend()
ax.set_title("Per-site test accuracy")
plt.show()
"""),
    ("code", """
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(history["train_loss"], label="FedAvg (n_k-weighted local loss)")
ax.plot(pooled_history["client_train_loss"][:, 0], label="pooled (epoch mean loss)")
ax.set_xlabel("round / epoch")
ax.set_ylabel("training loss")
ax.legend()
plt.show()
"""),
    ("md", """
## Weighted vs uniform averaging

`weighting="num_examples"` (McMahan et al.'s $n_k/n$) and `weighting="uniform"` (the
tutorial loop's plain average) optimise different objectives when the $n_k$ differ.
"""),
    ("code", """
uniform = fm.algorithms.fedavg(loss_fn, client_optimizer=optax.sgd(0.05), local_epochs=1,
                               batch_size=4, weighting="uniform")
u_state, _ = fm.run_rounds(uniform, uniform.init(params), train, 40, jax.random.PRNGKey(1),
                           progress=False)
u_report = fm.evaluation.binary_report(model.apply, u_state.params, test)
for s in sites:
    print(f"{s:12s} weighted {fedavg_report[s]['accuracy']:.3f}   uniform {u_report[s]['accuracy']:.3f}")
"""),
]


NOTEBOOKS = {"01_quickstart.ipynb": QUICKSTART}


def main():
  for name, cells in NOTEBOOKS.items():
    nbformat.write(notebook(cells), os.path.join(OUT, name))
    print("wrote", os.path.join(OUT, name))


if __name__ == "__main__":
  main()
