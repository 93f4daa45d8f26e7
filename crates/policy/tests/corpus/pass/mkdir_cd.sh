mkdir -p out && cd out && echo ready
