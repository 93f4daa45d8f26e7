class Config:
    debug = False

cfg = Config()
print(getattr(cfg, 'debug', True), hasattr(cfg, 'verbose'))
