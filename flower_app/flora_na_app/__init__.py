"""FLoRA-NA and every other aggregator of flora_na.AGGREGATORS on Flower (Message API).

server_app.py: the ServerApp, a FedAvg subclass whose aggregate_train calls the registry;
client_app.py: the ClientApp, train.client_update on the node's own partition;
wire.py: what travels (run config -> train.Args, LoRA factors and head <-> ArrayRecord).
The repository's root (flora_na.py, train.py, harness/) must be importable: see README.md.
"""
