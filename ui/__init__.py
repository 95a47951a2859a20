"""The browser front end (Gradio). Thin: every decision is made in assistant/ or store/."""
