"""The Kopf operator (coordinator and participant roles)."""
