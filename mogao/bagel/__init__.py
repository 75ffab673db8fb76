"""BAGEL checkpoints (ByteDance-Seed/Bagel, e.g. BAGEL-7B-MoT) read and written as data, and BAGEL's rules.

- `rules`: BAGEL's conventions (positions, position tables, timestep embedding, flow, CFG, special tokens);
- `flux_ae`: the FLUX autoencoder of `ae.safetensors` (original layout) as a diffusers AutoencoderKL, and back;
- `configs`: `llm_config.json` / `vit_config.json` parsed under a no-code policy into a `BagelArchitecture`;
- `folder`: a whole BAGEL folder checked, loaded and written;
- `keymap`: every BAGEL tensor's place in a MogaoModel (exact transforms both ways);
- `features`: BAGEL's features, the `ModelConfig` options that give them and what MogaoModel still lacks;
- `load`: a BAGEL folder as a working MogaoModel (`load_bagel_model`) and back (`save_bagel_model`);
- `files`: reading untrusted JSON and safetensors headers.
"""
