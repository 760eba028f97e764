"""protocol: the wire contract between edge agents and the aggregator (topics, messages, blob codec).

Importable without torch (numpy + pydantic + safetensors only). Filled by the networked-federation work.
"""
