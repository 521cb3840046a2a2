"""Handler mode: the wrapper calls main(input) and writes its return value."""


def main(input):
    return {"sum": sum(input["numbers"])}
