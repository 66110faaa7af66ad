"""Example Tapestry plug-in: a character LSTM and a plain-text loader.

Point a participant at it with ``ModelSpec.plugin("tapestry_example_plugin.models:build",
{...})`` and the loader factory ``"tapestry_example_plugin.data:make_loader"``; see
``README.md`` next to this package.
"""
