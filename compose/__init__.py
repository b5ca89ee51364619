"""Multi-node docker-compose jobs on one machine: every container a SageMaker host.

``compose.generate`` writes the compose files; ``compose.harness`` builds the image on a
private Docker engine and runs jobs (see docs/compose.md).
"""
