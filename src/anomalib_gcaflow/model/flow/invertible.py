"""Base of the flow's own invertible modules: FrEIA's contract for modules that keep every input's shape."""

from FrEIA.modules import InvertibleModule


class ShapePreservingModule(InvertibleModule):
    """FrEIA ``InvertibleModule`` whose outputs have the dims of its inputs (couplings, permutations, stacks)."""

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Return the input dims unchanged.

        Args:
            input_dims (list[tuple[int, ...]]): Dims of the inputs.

        Returns:
            list[tuple[int, ...]]: The same dims.
        """
        return input_dims
