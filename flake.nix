{
  description = "AccMan: prepaid balances for web APIs";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in {
      devShells = forAll (pkgs:
        let
          py = pkgs.python311.withPackages (ps: with ps; [
            uvloop plyvel cython setuptools wheel
            pytest pytest-benchmark pytest-xdist hypothesis
            httpx aiohttp uvicorn starlette httptools
          ]);
        in {
          default = pkgs.mkShell {
            packages = [ py pkgs.just pkgs.wrk pkgs.leveldb pkgs.redis pkgs.nginx pkgs.py-spy pkgs.ruff ];
            shellHook = ''
              echo "accman dev shell: just --list"
            '';
          };
        });
    };
}
