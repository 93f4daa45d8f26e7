class Counter {
  #n = 0;
  add(k = 1) { this.#n += k; return this; }
  get value() { return this.#n; }
}
console.log(`count: ${new Counter().add().add(2).value}`);
