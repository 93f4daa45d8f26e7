def kind(v):
    match v:
        case {'type': 'point', 'x': x, 'y': y}:
            return f'point {x},{y}'
        case [first, *rest]:
            return f'list starting {first}'
        case _:
            return 'other'

print(kind([1, 2]))
