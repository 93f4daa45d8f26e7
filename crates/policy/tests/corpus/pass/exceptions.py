def parse(s):
    try:
        return int(s)
    except ValueError as e:
        print('bad', e)
        return None
    finally:
        pass

print(parse('12'), parse('x'))
