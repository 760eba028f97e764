"""reid: the shared ML core (model, data, synthetic federation, local training, CDW, evaluation).

Pure ML: no networking and no CLIs. Used by the edge agent, the aggregator, the simulator and export.
"""
