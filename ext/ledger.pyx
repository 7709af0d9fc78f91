def hello():
    return 2
