type Vector = list[float]

def scale[T: (int, float)](v: list[T], k: T) -> list[T]:
    return [x * k for x in v]

print(scale([1.0, 2.0], 3.0))
