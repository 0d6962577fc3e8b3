"""Tiny random-weight checkpoints and the demo's data (no weights can be downloaded here).

``checkpoints``: SD1.5-, SDXL- and FLUX-like diffusers directories with offline tokenizers;
``omni_zero``: the Omni-Zero checkpoint (SDXL plus adapters, ControlNets, face and depth models)
and synthetic portraits; ``demo``: one checkpoint per slug and the seed pages' example payloads.
"""
