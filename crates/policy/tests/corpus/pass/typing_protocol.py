from typing import Protocol, TypedDict

class HasLen(Protocol):
    def __len__(self) -> int: ...

class Row(TypedDict):
    name: str

def size(x: HasLen) -> int:
    return len(x)

print(size([1, 2]))
