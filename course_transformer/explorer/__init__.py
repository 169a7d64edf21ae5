"""The attention explorer: a local gradio app over any model that returns attention weights (issue 14).

Files in dependency order: `loading` (models, inputs), `compute` (pure functions on tensors), `figures`
(matplotlib), `app` (the gradio UI). `course-transformer explore MODEL` starts it.
"""
