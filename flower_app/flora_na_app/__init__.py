"""FLoRA-NA and every other aggregator of flora_na.AGGREGATORS on Flower (Message API).

server_app.py: the ServerApp, a Strategy whose aggregate_train calls the registry;
client_app.py: the ClientApp (no torch import), which hands each round to client_work.py, in
its own process in a simulation or in the node's warm worker (worker.py) in a deployment;
wire.py: what travels (run config -> train.Args, LoRA factors and head <-> ArrayRecord);
packing.py: a message's arrays packed into two, so that Flower moves two objects, not dozens;
version.py: the code version every message carries and every client checks.
The project (flora_na.py, train.py, harness/) is installed with `pip install -e .` at the
repository's root: see README.md.
"""
