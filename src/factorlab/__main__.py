from factorlab.cli import app

app()
