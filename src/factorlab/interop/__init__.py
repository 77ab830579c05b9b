"""Reading and writing other libraries' adapter formats."""
