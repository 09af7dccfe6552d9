// Symbolic differentiation of the mod expression IR, for the backward pass of a score_mod:
// d mod / d score, and d mod / d (each captured float buffer element the mod reads), as IR
// trees that codegen emits like any other mod expression. Also the algebraic simplifier that
// keeps those derivative trees small.
#pragma once

#include <vector>

#include "jit/ir.h"

namespace flexjit::ir {

// d e / d score for a Float-typed score_mod expression e, simplified (see simplify below).
// Follows PyTorch autograd's conventions where a function is not differentiable everywhere:
// abs'(x) = sign(x) (0 at 0); floor, ceil and casts to int: 0; min/max of floats (like
// torch.minimum/maximum) send the gradient to the smaller/larger operand, split 0.5/0.5 on a
// tie; select(c, a, b) -> select(c, a', b') (comparisons are not differentiated: a
// subgradient); int- and bool-typed subtrees have derivative 0 (so float(int) -> 0).
// A tree that is not Float-typed (a mask_mod) gives the constant 0.
Expr grad_score(const Expr& e);

// One differentiable read of a captured float buffer: the Load node (identity = node pointer; its
// ->name is the buffer, ->args the index expressions) and d e / d (that buffer element), simplified.
struct LoadGrad {
  Expr load;
  Expr partial;
};

// Every distinct Float-typed Load node (by pointer) reachable in e outside index expressions, in
// first-visit depth-first order (args left to right), each with its partial derivative; loads whose
// partial simplifies to the constant 0 are left out. Loads of int buffers, and anything inside a
// Load's index expressions (int context), are not differentiable and do not appear. If the same node
// pointer is used twice, the partial accounts for both uses (it is one variable).
// Two distinct Load nodes that read the same element are two entries; the gradient of that
// element is the sum of their partials.
std::vector<LoadGrad> grad_loads(const Expr& e);

// Algebraic simplification that never changes the value for finite inputs: folds constant
// sub-expressions (evaluated in float64 like ir::eval; an int division by a constant 0 is left
// alone), x*1, 1*x, x+0, 0+x, x-0, 0-x -> -x, x/1, -(-x), select(true/false, ..),
// select(c, a, a) -> a, and 0*x / x*0 -> 0 (deliberate, like autograd's zero gradients for
// masked-out paths, even though 0*inf is NaN). The result is well typed and has e's type.
// Unchanged subtrees are shared, and Load nodes are kept as they are (same pointer, index
// expressions untouched), so loads found in e can be matched in the result by pointer.
Expr simplify(const Expr& e);

}  // namespace flexjit::ir
