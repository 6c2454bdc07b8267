"""The command layer: every ``moeframe`` command's front-end, and nothing else.

``main`` chooses the command; ``train`` is the LightningCLI behind fit/validate/test/predict;
the other commands (``plugins``, ``inspect``, ``convert``, ``prepare``, ``generate``,
``esft_select``, ``new_plugin``) are each a typed function whose signature is its parser
(``signature``); ``boundary`` turns bad input into one line and an exit status. Library modules
never import this package: it sits on top (registry <- config <- model <- training <- commands).
"""
