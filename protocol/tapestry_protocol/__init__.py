"""The round protocol shared by every component.

Object store, key layout, signed documents and safetensors shards.
"""
