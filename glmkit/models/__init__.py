"""The models: one ``Decoder`` for the lineage from ChatGLM2 on (``decoder.py``; every checkpoint family and course
preset is a setting of its config, ``presets.py``), and GLM-2021's blank-infilling transformer (``glm2021.py``,
lesson 01), a subclass with learned 2D positions."""
