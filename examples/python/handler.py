"""Handler mode: the wrapper calls main(input) and writes its return value."""


def main(input):
    if not isinstance(input, dict) or "numbers" not in input:
        raise ValueError('expected an input like {"numbers": [1, 2, 3]} (pass --input)')
    return {"sum": sum(input["numbers"])}
