def main():
    print(__name__, __file__)

if __name__ == '__main__':
    main()
