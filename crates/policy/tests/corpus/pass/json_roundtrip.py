import json

with open('config.json') as f:
    cfg = json.load(f)
cfg['version'] = cfg.get('version', 0) + 1
with open('config.json', 'w') as f:
    json.dump(cfg, f, indent=2)
