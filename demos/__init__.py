"""Demos: the Gradio web app (`omni demo`) and a command-line client, both clients of the OpenAI-compatible API.

Installed as `omni.demos` so that `omni demo` finds the app in a wheel too; nothing else imports this package."""
